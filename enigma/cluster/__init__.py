"""Ray: starting or joining a cluster."""
