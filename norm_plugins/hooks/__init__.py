from .bcn_update_rate_hook import BCNUpdateRateHook

__all__ = ['BCNUpdateRateHook']
