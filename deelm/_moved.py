"""Module paths of deelm before its subpackages, kept importable for a while.

`import deelm.lora` (and the other flat names below) still works: it gives a
module that reads each attribute from the module(s) it moved to, and warns
once with the new name. New code imports the new paths.
"""
import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

# old module -> the modules that now hold its names, searched in order
MOVED = {
    "deelm.analysis": ("deelm.eval.analysis",),
    "deelm.evaluation": ("deelm.eval.sts",),
    "deelm.mteb_model": ("deelm.eval.mteb_model",),
    "deelm.mteb_tasks": ("deelm.eval.mteb_tasks",),
    "deelm.summary": ("deelm.io.summary",),
    "deelm.gguf_file": ("deelm.io.gguf",),
    "deelm.hf_checkpoint": ("deelm.io.hf",),
    "deelm.tokenizer": ("deelm.io.tokenizer",),
    "deelm.model_file": ("deelm.io.layout", "deelm.io.hf", "deelm.io"),
    "deelm.default_model": ("deelm.io.default_model", "deelm.adapters.bundled"),
    "deelm.lora": ("deelm.adapters.lora", "deelm.adapters.peft", "deelm.io.atomic"),
    "deelm.train_data": ("deelm.train.data",),
    "deelm.losses": ("deelm.train.losses",),
    "deelm.optim": ("deelm.train.optim",),
    "deelm.checkpoint": ("deelm.train.checkpoint",),
}


class _MovedModule(types.ModuleType):
    def __init__(self, name, targets):
        super().__init__(name, f"deelm moved this module to {', '.join(targets)}")
        self._targets = targets

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        for target in self._targets:
            module = importlib.import_module(target)
            if hasattr(module, attr):
                return getattr(module, attr)
        raise AttributeError(f"module {self.__name__!r} (now {', '.join(self._targets)}) "
                             f"has no attribute {attr!r}")

    def __dir__(self):
        names = set()
        for target in self._targets:
            names.update(dir(importlib.import_module(target)))
        return sorted(names)


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        targets = MOVED[spec.name]
        warnings.warn(f"{spec.name} is now {' + '.join(targets)}; the old path will be removed",
                      DeprecationWarning, stacklevel=3)
        return _MovedModule(spec.name, targets)

    def exec_module(self, module):
        pass


def install():
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedFinder())
