"""Hooks on Keras objects: an instance's method that runs an action around itself.

The drivers follow what users and other callbacks do to a model (set its
weights, save it, end a fit) by hooking these methods. A hook is set on the
instance with `object.__setattr__`, bypassing Keras' attribute tracking, so
the model's layers and weights stay what the user built, and `unhook`
takes it off again.
"""

import functools


def hook(obj, name, *, before=None, after=None):
    """Makes `obj.<name>(...)` run `before()`, then itself, then `after()`.

    Example:

    ```python
    hook(model, "save", before=strategy.synchronize)  # save the averaged model
    ```
    """
    method = getattr(obj, name)

    @functools.wraps(method)
    def hooked(*args, **kwargs):
        if before is not None:
            before()
        result = method(*args, **kwargs)
        if after is not None:
            after()
        return result

    hooked._fda_hook = True
    object.__setattr__(obj, name, hooked)


def unhook(obj, names):
    """Takes the hooks of `hook` off `obj`'s methods `names`."""
    state = vars(obj)
    for name in names:
        if getattr(state.get(name), "_fda_hook", False):
            del state[name]


def run_once_after(callback, method, action):
    """Makes `callback.<method>(logs)` run `action(logs)` after itself, the next time only."""
    original = getattr(callback, method)
    own = method in vars(callback)

    def hooked(logs=None):
        if own:
            setattr(callback, method, original)
        else:
            delattr(callback, method)
        original(logs)
        action(logs)

    setattr(callback, method, hooked)
