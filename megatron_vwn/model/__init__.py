"""Model definition: specs, builder, initialisation and accounting."""
