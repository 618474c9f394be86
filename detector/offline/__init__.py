"""Offline work that needs torch: demo models, attacks, training the introspection VAE.

Nothing on the serving path imports this package.
"""
