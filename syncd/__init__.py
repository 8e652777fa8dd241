"""syncd: a real-time state sync server. Declare tables and reducers; clients subscribe to SQL."""
