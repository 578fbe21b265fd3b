"""Model registry and loaders: hub ids, local folders, GGUF files and the bundled real pair."""
