"""Adapter bundles: write (sealed), read (verified), merge, export and share."""
