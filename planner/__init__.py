"""Long-term capacity planning: WHA anomaly filter, forecaster, reservation planner."""
