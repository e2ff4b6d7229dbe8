"""Registry: MLflow's side of the house.

Owns: the logged model (``pyfunc``: prompts in, PNGs out; registration), its files (``bundle``),
promotion by alias (``promote``), lineage tags (``lineage``), the training run's tracking
(``tracking``) and resolving and fetching registered versions (``versions``).

May import: the foundation, ``diffusion.data``, ``diffusion.models``, ``diffusion.sampling``,
``diffusion.evaluation``.
"""


def __getattr__(name: str):
    # Models registered before the package was split into subpackages pickled their pyfunc class
    # as ``diffusion.registry.T2IModel``; unpickling one in a process that already imported this
    # package looks it up here. Lazy, so ``diffusion.registry.lineage`` does not import MLflow.
    if name == "T2IModel":
        from diffusion.registry.pyfunc import T2IModel

        return T2IModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
