package main

func runFaults(args []string) int { return usageErr("faults", "not implemented yet") }
