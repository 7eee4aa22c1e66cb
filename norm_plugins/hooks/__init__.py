from .bcn_update_rate_hook import BCNUpdateRateHook
from .precise_stats_hook import PreciseStatsHook
from .sn_hard_ratios_hook import SNHardRatiosHook
from .sn_ratio_logger_hook import SNRatioLoggerHook
from .ssn_radius_hook import SSNRadiusHook

__all__ = ['BCNUpdateRateHook', 'PreciseStatsHook', 'SNHardRatiosHook', 'SNRatioLoggerHook', 'SSNRadiusHook']
