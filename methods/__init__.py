"""The distillation methods, one file each; importing the package registers every one of them.

A method is a file here that calls ``registry.register_method`` with its loss builder (or run
function), its parameters, its published recipe and its source. Adding one is that file plus its
test: the package imports every module in this folder, so nothing else is edited.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):  # helpers shared by several methods
        importlib.import_module(f"{__name__}.{_module.name}")
