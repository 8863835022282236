module tester-go

go 1.19
