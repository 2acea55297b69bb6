"""unime_ray: UniME-V2 on Ray."""
