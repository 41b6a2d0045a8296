"""The catalog's config files live here; `from moeserve.plan.catalog import resolve_catalog` finds one."""

from moeserve.plan.catalog_index import CATALOG_DIR, SHAPE_ALIASES, catalog_entries, resolve_catalog

__all__ = ["CATALOG_DIR", "SHAPE_ALIASES", "catalog_entries", "resolve_catalog"]
