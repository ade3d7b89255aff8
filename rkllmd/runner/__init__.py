"""One process per loaded model, as Ollama runs its runners: a crash in the model's code (a
segfault in the vendor library, a SIGKILL) ends that model's requests with ``backend``, never
the daemon. ``child`` is the runner process, ``proxy`` the daemon's side of it."""
