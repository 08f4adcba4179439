"""Prompt sources: reading prompt files and turning prompts into model inputs."""
