"""The export stage's parts: merge.py (16-bit merged weights), gguf.py (convert, quantize, verify
against the merged model), and the Hub push (grpoflow/hub.py); stages/export.py runs them in order."""
