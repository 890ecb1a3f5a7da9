"""The train stage, as a package: ``recipe`` reads top to bottom (setup -> fit -> save -> cleanup) and calls the
modules beside it. ``scripts/train.py`` is its command line; ``recipe.train`` its entry point."""
