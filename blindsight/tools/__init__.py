"""The user's tools on top of the library: the ``blindsight`` command line (:mod:`.cli`) and what its commands
run: ``demo`` (:mod:`.demo`), ``eval`` (:mod:`.evaluate`), ``bench`` (:mod:`.bench`), prompt files
(:mod:`.data`), pictures (:mod:`.viz`) and the built-in shapes and layouts of the examples (:mod:`.presets`).
Nothing in the library imports them."""
