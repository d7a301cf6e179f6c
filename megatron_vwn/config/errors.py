"""The one exception a user sees for bad input."""


class ConfigError(ValueError):
    """A configuration value is invalid.

    The message always names the offending key (dotted path) and what is allowed, e.g.
    ``model.hidden_size (100) must be divisible by model.num_attention_heads (3)``. The CLI prints
    it as a single line and exits with status 2, before any process group exists.
    """
