"""Fake SGLang and vLLM servers for tests: real FastAPI apps on 127.0.0.1 that speak the
documented wire formats (docs: /work/shared/docs/engine-apis.md §1-2), backed by a tiny real
transformers model so every number they return is a real forward pass."""
