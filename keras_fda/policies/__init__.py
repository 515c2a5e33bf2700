"""Pure policies: what to estimate, when to sync, how to apply a sync.

Variance estimators and the AMS sketch (`estimators`, `sketch`), sync triggers
(`triggers`), sync rules with the outer optimizer (`outer`) and the exchange
cadence (`cadence`). Math on tensors and numbers only: nothing here knows how
values travel between workers.
"""
