"""bench_train.py's parts (see its docstring): data (the inputs both systems share), runs
(running each system in its own process), peer (the HF Trainer + peft worker) and profile
(where a step's time goes). Importable as `benchlib` with scripts/ on sys.path: running
scripts/bench_train.py puts it there, and so does pytest (pyproject's pythonpath)."""
