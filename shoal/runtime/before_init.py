"""Imports that must come before the first `init_process_group` of a process.

`torch.distributed.nn.functional` binds `group=group.WORLD` as default arguments when it
is first imported, and `torch._dynamo` imports it (the first `optimizer.step()` does).
Imported after `init_process_group`, those defaults hold the default process group for
good: `destroy_process_group` then cannot free it, its Gloo threads outlive the training
code, and one of them finishing its last collective while the interpreter shuts down
aborts the process ("terminate called without an active exception", SIGABRT) after a
run that succeeded. Imported first, the defaults bind None. See docs/torch.md.

Every module that starts a process group imports this one.
"""

import torch.distributed.nn.functional  # noqa: F401  (imported for the side effect above)
