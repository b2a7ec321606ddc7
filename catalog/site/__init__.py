"""The documentation site: ``python -m catalog site`` (see ``catalog.site.build``).

``context`` (pure: entries and results -> page data), ``escape`` (entry text made inert), ``kernels``
(kernel pages), ``plots`` (matplotlib SVG), ``refresh`` (re-bench stale results), ``build`` (render and
run mkdocs), ``cli`` (the subcommand). Importing this package does no work.
"""
