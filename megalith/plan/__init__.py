"""Models of a layout's cost from its shapes alone (pure: no torch, no processes): what the
planner and the startup memory report compute before anything is built."""
