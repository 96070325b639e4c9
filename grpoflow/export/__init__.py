"""The export stage's parts: merge to 16-bit, GGUF (coming), verification (coming), Hub push (grpoflow/hub.py)."""
