"""Dataset validation: probe every image file, tabulate, and run Great Expectations suites.

`iagn.steps.validate.run` ties the pieces together: `probe` (files), `tables` (the image
and per-class tables GX validates), `rules` (the configurable expectations), `gx` (the
suites, results and Data Docs) and `report` (validation.json, summary.md, console text).
"""
