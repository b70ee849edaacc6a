"""Pipeline parallelism: schedules as data (pure), their checks, simulator and timeline; the engine."""
