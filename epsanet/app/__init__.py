"""The application layer: what every command and the Python API share, between the library (layers, models,
weights, data, optimize) and the jobs (train, predict, features, explain, export, quantize, benchmark).

* :mod:`.model`: a ready model from any weights source (:func:`~.model.build_model`,
  :func:`~.model.load_for_inference`);
* :mod:`.data`: the data set and image inputs from options, the eval transform and loader;
* :mod:`.device`: the device (checked), torchrun's distributed set-up, autocast;
* :mod:`.flags`: dataclass configs as argparse flags and YAML files, and their checks;
* :mod:`.errors`: the errors a user can fix (bad option, unreadable checkpoint, ...);
* :mod:`.outputs`: the output policy: what a command may write, and where.

Imports only go down: ``epsanet.cli`` > jobs > ``epsanet.app`` > library (``[tool.importlinter]`` in
pyproject.toml).
"""
