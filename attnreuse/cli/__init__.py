"""``python -m attnreuse search`` and ``bench``: PHAST and its measurement on a checkpoint of your own.

``models`` loads a model (the embedded digits model or a diffusers UNet pipeline) behind one sampling call,
``options`` holds the arguments both commands share and their checks, ``world`` the processes of a
distributed search, ``trace`` the resumable record of a search, ``figures`` the PNGs, ``search`` and
``bench`` the commands.
"""
