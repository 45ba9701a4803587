"""Models: the built-in networks, user factories, and cutting a network into stages."""
