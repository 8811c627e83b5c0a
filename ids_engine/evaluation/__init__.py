"""Plan evaluation: DVHs and DVH metrics, conformity and homogeneity indices, goal checks,
plan comparison, plan reports, isodose positions."""

from ._dvh import DVH, DeviceDVH, dvh, dvh_metrics
from ._goals import Goal, GoalResult, check_goals, parse_goal, tg119_goals
from ._isodose import beside_shift_mm, drag_landing_mm, level_crossing_mm
from ._metrics import (
    DMAX_VOLUME_CC,
    Metric,
    StructureDose,
    conformity_index,
    gradient_index,
    homogeneity_index,
    parse_metric,
)
from ._report import PlanReport, Prescription, dvh_png, write_plan_report
from ._table import MetricRow, PlanComparison, compare_plans, default_metrics, plan_metrics

__all__ = [
    "DMAX_VOLUME_CC",
    "DVH",
    "DeviceDVH",
    "Goal",
    "GoalResult",
    "Metric",
    "MetricRow",
    "PlanComparison",
    "PlanReport",
    "Prescription",
    "StructureDose",
    "beside_shift_mm",
    "check_goals",
    "compare_plans",
    "conformity_index",
    "default_metrics",
    "drag_landing_mm",
    "dvh",
    "dvh_metrics",
    "dvh_png",
    "gradient_index",
    "homogeneity_index",
    "level_crossing_mm",
    "parse_goal",
    "parse_metric",
    "plan_metrics",
    "tg119_goals",
    "write_plan_report",
]

from . import _dvh_sampling, _points  # noqa: E402 (issue 12: sampled DVHs; points, BEV entry, point files)
from ._dvh_sampling import *  # noqa: E402,F401,F403 (the names in its __all__)
from ._points import *  # noqa: E402,F401,F403 (the names in its __all__)

__all__ += _dvh_sampling.__all__ + _points.__all__

# Physics summary of a forward plan (issue 12).
from ._physics_summary import PhysicsSummary, SummaryPoint, physics_summary, write_physics_summary  # noqa: E402
__all__ += ["PhysicsSummary", "SummaryPoint", "physics_summary", "write_physics_summary"]  # noqa: E402

# Gamma index (issue 13: deliverable-dose check).
from ._gamma import gamma_index, gamma_pass_rate, gamma_summary, grid_axes_mm  # noqa: E402
__all__ += ["gamma_index", "gamma_pass_rate", "gamma_summary", "grid_axes_mm"]  # noqa: E402

# Physics summary as PDF; DVHs of several plans together (issue 12).
from ._dvh_plot import DVH_METHODS, plan_dvh_curves, plans_dvh_png  # noqa: E402
from ._physics_summary import write_physics_summary_pdf  # noqa: E402
__all__ += ["DVH_METHODS", "plan_dvh_curves", "plans_dvh_png", "write_physics_summary_pdf"]  # noqa: E402
