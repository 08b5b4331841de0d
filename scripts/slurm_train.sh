#!/usr/bin/env bash
# Train on several machines under SLURM: one torchrun agent per machine, each starting one
# process per GPU; the agents find each other by c10d rendezvous at the job's first machine.
#
#   sbatch scripts/slurm_train.sh CONFIG [key=value ...]            (from the repository root)
#   sbatch --nodes 4 --gpus-per-node 8 scripts/slurm_train.sh configs/internlm2_chat_7b/finetune.yaml \
#       model.llm=/shared/models/internlm2-chat-7b run_dir=/shared/runs/7b-finetune
#
# The global batch is train.batch_size x train.grad_accum x nodes x GPUs per node: with more
# machines, lower train.grad_accum to keep the recipe's batch.
#
# What every machine needs (README, "Several machines"):
#   - the code and its Python environment, the base LLM, the vision tower and the data at the
#     same paths (a shared filesystem, or copies): make the environment once beforehand
#     (`bash scripts/setup_env.sh`) where every machine sees it, or set PYTHON;
#   - run_dir on a shared filesystem: the main machine alone writes it, and
#     train.resume=true needs its checkpoints/ on every machine;
#   - data.cache_dir: here each machine prepares the data in a folder of its own (DATA_CACHE,
#     node-local by default), which works on any filesystem; point DATA_CACHE at one shared
#     folder to prepare once for all machines (needs file locks that work across machines:
#     NFSv4, Lustre mounted with -o flock, GPFS); DATA_CACHE= keeps the config's own setting;
#   - data.feature_cache (optional): shared, the machines split the images between them;
#     node-local, every machine computes all of them (each copy must hold the whole cache).
#
# Environment (all optional): GPUS_PER_NODE (default: SLURM's count, else nvidia-smi's),
# MASTER_PORT (default: from the job id), DATA_CACHE, PYTHON, ROOT (default: the folder
# sbatch ran in). Network settings, if your cluster needs them: NCCL_SOCKET_IFNAME,
# NCCL_IB_HCA, ... (NCCL's documentation).
#
#SBATCH --job-name=llava-tune
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: sbatch scripts/slurm_train.sh CONFIG [key=value ...]" >&2
  exit 2
fi
: "${SLURM_JOB_NODELIST:?run this with sbatch (it reads the machines of the job from SLURM)}"

# sbatch runs a copy of this file from its spool folder, so the repository is where sbatch ran.
ROOT="${ROOT:-${SLURM_SUBMIT_DIR:-$(pwd)}}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
NODES="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}}"
if [ "${GPUS_PER_NODE:-0}" -lt 1 ]; then
  echo "no GPUs found on $(hostname); set GPUS_PER_NODE" >&2
  exit 2
fi
# The rendezvous runs on the job's first machine; the others connect to it. (Read whole, not
# through `head -n 1`: with pipefail, scontrol killed by the closed pipe would fail the job.)
mapfile -t HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
MASTER_ADDR="${HOSTS[0]:?scontrol named no machines for $SLURM_JOB_NODELIST}"
MASTER_PORT="${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}"  # two jobs, two ports
DATA_CACHE="${DATA_CACHE-${TMPDIR:-/tmp}/llava-tune-data-${USER:-$(id -u)}}"
CACHE_ARG=()
if [ -n "$DATA_CACHE" ]; then CACHE_ARG=("data.cache_dir=$DATA_CACHE"); fi

# srun no longer inherits sbatch's --cpus-per-task (SLURM 22.05 on): pass it on.
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"; fi

echo "llava-tune on $NODES machines x $GPUS_PER_NODE GPUs, rendezvous at $MASTER_ADDR:$MASTER_PORT" >&2
cd "$ROOT"
CONFIG="$1"
shift
# One task per machine (srun), each a torchrun agent. The key=value arguments follow
# data.cache_dir, so a data.cache_dir=... given to this script wins (the last value does).
srun --kill-on-bad-exit=1 --ntasks-per-node=1 \
  env TOKENIZERS_PARALLELISM=false "$PYTHON" -m torch.distributed.run \
    --nnodes "$NODES" --nproc_per_node "$GPUS_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "${SLURM_JOB_ID:-llava-tune}" \
    -m llava_tune train "$CONFIG" ${CACHE_ARG[@]+"${CACHE_ARG[@]}"} "$@"
