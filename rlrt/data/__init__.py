"""Small prompt sets generated locally (no download), written as the JSONL the trainer reads."""
