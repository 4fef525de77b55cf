"""A patched pipeline's progress bar drives the clock: the sampler's own step count, not a guess.

Every diffusers UNet pipeline opens ``with self.progress_bar(total=num_inference_steps)`` before its first
UNet call, with the steps this generation really runs (img2img ``strength``, ``denoising_start``/``_end``
applied), calls ``update()`` once per sampling step (once per ``scheduler.order`` UNet evaluations) and
leaves the block when sampling ends, is cancelled (``pipe._interrupt``) or fails. Older pipelines iterate
``self.progress_bar(timesteps)``: one step per item. :class:`ProgressClock` is installed as the
*instance* attribute ``pipe.progress_bar`` (the class stays, so the pipeline pickles) and turns these into
generation start (the schedule resolved), step advance and generation end (all maps dropped).
"""
from __future__ import annotations


class ProgressClock:
    """Replaces ``pipe.progress_bar`` for one patched pipeline."""

    def __init__(self, clock, pipe):
        self.clock = clock
        self.pipe = pipe

    def __call__(self, iterable=None, total=None):
        bar = type(self.pipe).progress_bar(self.pipe, iterable=iterable, total=total)
        if iterable is not None:
            return _iterate(self.clock, bar)
        return _SteppedBar(bar, self.clock.begin(total))


def _iterate(clock, bar):
    if bar.total is None:
        raise ValueError("attnreuse: the pipeline iterates a progress bar of unknown length, so the number of "
                         "steps is unknown: use `with handle.generation(num_steps) as gen:` around the call")
    gen = clock.begin(int(bar.total))
    try:
        for i, item in enumerate(bar):
            if i:
                gen.advance()
            yield item
    finally:  # also when the loop breaks (the generator is closed) or raises
        clock.end(gen)


class _SteppedBar:
    """The pipeline's tqdm bar; ``update`` advances the generation, leaving the block or ``close`` ends it."""

    def __init__(self, bar, generation):
        self._bar = bar
        self._gen = generation

    def update(self, n: int = 1):
        if n:  # tqdm allows update(0): no step ended
            self._gen.advance(n)
        return self._bar.update(n)

    def close(self):
        self._gen.end()
        return self._bar.close()

    def __enter__(self):
        self._bar.__enter__()
        return self

    def __exit__(self, *exc):
        self._gen.end()
        return self._bar.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self._bar, name)
