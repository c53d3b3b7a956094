"""Training of SSB / SSB++ models (installed as ssb_fast.train)."""
