"""Layer 0, the mathematics every other layer shares: participation schemas, workloads, power
series and the sensitivity routines (docs/design.md, "The mathematics"). Imports nothing above it."""
