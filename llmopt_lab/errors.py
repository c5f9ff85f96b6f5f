"""Errors the library raises on bad input.

Every error a user can cause by passing the wrong thing derives from
:class:`LlmoptError`, so the command line can print its one-line message
instead of a traceback. Each message names the cause and, where there is one,
the fix.
"""


class LlmoptError(Exception):
    """Base class for user-facing errors of llmopt_lab (one-line messages)."""


class ConfigError(LlmoptError, ValueError):
    """A model configuration the library cannot run (or that is malformed)."""


class ModelLoadError(LlmoptError, ValueError):
    """A model could not be loaded: missing path, offline hub, bad checkpoint."""


class UnsupportedDtypeError(LlmoptError, ValueError):
    """A dtype the requested device cannot compute in."""


class CacheError(LlmoptError, ValueError):
    """A KV cache that does not fit the model, the batch, or the request."""


class MeasureError(LlmoptError, ValueError):
    """Bad arguments to a measurement, metric, plot or result helper (empty
    samples, non-positive sizes or times, unknown devices or dtypes)."""


class GenerationError(LlmoptError, ValueError):
    """Bad arguments to generation (lengths, sampling parameters)."""


class TransformError(LlmoptError, ValueError):
    """A model transform (quantization, pruning, ...) that cannot be applied to
    this model: a module name that does not exist, a model without decoder blocks."""


class QuantizationError(TransformError):
    """A quantization request the library cannot honour: unknown method or
    option, unsupported group size, a layer shape a format cannot take, a
    missing calibration set, a device without the needed feature."""


class PruningError(TransformError):
    """A pruning request the library cannot honour: a sparsity outside [0, 1),
    an N:M pattern that does not divide the layer, an unknown method or scope,
    a missing calibration set."""


class TrainingError(LlmoptError, ValueError):
    """Bad training settings or arguments (steps, precision for the device, checkpoint)."""


class ServingError(LlmoptError, ValueError):
    """A request or engine setting the serving engine cannot take (a prompt
    longer than the context, a KV budget too small for one request, an unknown
    batching policy, a request id it does not know)."""


class ParallelError(TransformError):
    """A parallel run that cannot go ahead as asked: a degree that does not
    divide the model's heads, vocabulary or layers, a process group of the
    wrong size, a worker process that failed, a launch without torchrun's
    environment."""
