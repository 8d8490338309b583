"""Plans: the builder's output and the runtime's input."""
from kiln.plan.format import FORMAT_VERSION, Plan, load_plan, plan_from_bytes, plan_to_bytes, save_plan

__all__ = ["FORMAT_VERSION", "Plan", "load_plan", "plan_from_bytes", "plan_to_bytes", "save_plan"]
