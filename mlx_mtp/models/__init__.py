"""Model implementations: the Gemma 4 target and the Gemma 4 assistant drafter."""
