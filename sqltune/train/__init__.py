"""Supervised fine-tuning: data (tokenised records, length-grouped batches), model setup per finetuning type, and
the training recipe (sft.py).

Importing this package makes the import system set `sqltune.train` to it, in place of the API function
`sqltune.train`; so the package is callable and does exactly what that function does."""

import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, cfg=None, **options) -> dict:
        from sqltune.stages import call

        return call("train", cfg, options)


sys.modules[__name__].__class__ = _CallablePackage
