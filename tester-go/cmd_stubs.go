package main

func runFaults(args []string) int  { return usageErr("faults", "not implemented yet") }
func runBench(args []string) int   { return usageErr("bench", "not implemented yet") }
func runCompare(args []string) int { return usageErr("compare", "not implemented yet") }
