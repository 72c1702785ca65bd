"""The embedded world and ``diffalign demo``: alignment you can watch on a laptop."""
