"""Serving: the corpus index (`index`), the corpus readers it builds from (`corpus`) and the Ray Serve
application (`app`)."""
