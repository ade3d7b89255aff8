"""Several models by name: the registry (what each name means), the pool (what is loaded),
keep_alive durations and pulls from the Hugging Face hub."""
