"""Where and how artifacts live: fast/bulk tiers, stage directories with manifests, atomic writes."""
