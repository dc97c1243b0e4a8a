"""keepwarm: ``functools.lru_cache`` whose results survive reruns.

Results live in a keepwarm host (``keepwarm serve``), in the cache named
after the decorated function; rerunning the script — ``runpy.run_path``,
``exec``, ``%run``, or ``python script.py`` again — finds them there::

    import keepwarm

    @keepwarm.memo
    def square(x):
        print("Squaring", x)
        return x * x

The host is found as the ``keepwarm`` command finds it: ``KEEPWARM_SOCKET``,
else the one live host in the runtime directory. With no host, the function
still runs, with an in-process cache and one warning.
"""

from ._memo import CacheInfo, Memoized, memo

__all__ = ["memo", "CacheInfo", "Memoized"]
__version__ = "0.1.0"
