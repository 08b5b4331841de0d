"""Values shared by every layer of llava-tune."""

IGNORE_INDEX = -100
"""Label value that carries no loss (prompts, image slots, padding)."""

IMAGE_TOKEN = "<image>"
"""Where an image goes in a conversation's text."""

IMAGE_TOKEN_INDEX = -200
"""Placeholder id for one image slot in input_ids; each image fills N consecutive slots."""
