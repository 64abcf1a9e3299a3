"""Teaching scripts of the engines chapter: static vs continuous batching, KV memory waste, prefix caching."""
