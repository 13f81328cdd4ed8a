"""Feature pages: what each latent of a trained SAE fires on, as static HTML + JSON.

:mod:`~saelab.browse.collect` (one bounded-memory pass over the eval activations),
:mod:`~saelab.browse.lens` (logit lens, decoder neighbours), :mod:`~saelab.browse.build` (the
pages), :mod:`~saelab.browse.pages` (the stage functions), :mod:`~saelab.browse.serve`
(``saelab browse``).
"""
