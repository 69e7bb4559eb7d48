"""Applications that use compiled bound functions (certificates, training, distributed runs...)."""
