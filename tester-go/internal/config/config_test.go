package config

import (
	"reflect"
	"strings"
	"testing"
)

func TestParse(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		ports   [][]int
		wantErr string
	}{
		{"numbers", `{"Apps":[{"Name":"a","Ports":[5001,5200],"Targets":["127.0.0.1:1"]}]}`, [][]int{{5001, 5200}}, ""},
		{"strings", `{"Apps":[{"Name":"a","Ports":["5001"," 5002 "],"Targets":["127.0.0.1:1"]}]}`, [][]int{{5001, 5002}}, ""},
		{"range", `{"Apps":[{"Name":"a","Ports":["8000-8003",9000],"Targets":["127.0.0.1:1"]}]}`, [][]int{{8000, 8001, 8002, 8003, 9000}}, ""},
		{"single range", `{"Apps":[{"Name":"a","Ports":["7-7"],"Targets":["127.0.0.1:1"]}]}`, [][]int{{7}}, ""},
		{"two apps", `{"Apps":[{"Name":"a","Ports":[1],"Targets":["127.0.0.1:1"]},{"Name":"b","Ports":[2],"Targets":["x:1"]}]}`, [][]int{{1}, {2}}, ""},
		{"reversed range", `{"Apps":[{"Name":"a","Ports":["9-8"],"Targets":["127.0.0.1:1"]}]}`, nil, "end before start"},
		{"port zero", `{"Apps":[{"Name":"a","Ports":[0],"Targets":["127.0.0.1:1"]}]}`, nil, "out of range"},
		{"port too big", `{"Apps":[{"Name":"a","Ports":["65536"],"Targets":["127.0.0.1:1"]}]}`, nil, "out of range"},
		{"float", `{"Apps":[{"Name":"a","Ports":[1.5],"Targets":["127.0.0.1:1"]}]}`, nil, "not an integer"},
		{"bool", `{"Apps":[{"Name":"a","Ports":[true],"Targets":["127.0.0.1:1"]}]}`, nil, "want a number"},
		{"garbage string", `{"Apps":[{"Name":"a","Ports":["x"],"Targets":["127.0.0.1:1"]}]}`, nil, "bad port"},
		{"duplicate port", `{"Apps":[{"Name":"a","Ports":[1],"Targets":["127.0.0.1:1"]},{"Name":"b","Ports":["1-2"],"Targets":["127.0.0.1:1"]}]}`, nil, "both"},
		{"no apps", `{"Apps":[]}`, nil, "no Apps"},
		{"no targets", `{"Apps":[{"Name":"a","Ports":[1],"Targets":[]}]}`, nil, "no Targets"},
		{"bad target", `{"Apps":[{"Name":"a","Ports":[1],"Targets":["nope"]}]}`, nil, "bad target"},
		{"not json", `{`, nil, "config"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := Parse([]byte(tt.in))
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			var got [][]int
			for _, a := range c.Apps {
				got = append(got, []int(a.Ports))
			}
			if !reflect.DeepEqual(got, tt.ports) {
				t.Fatalf("ports = %v, want %v", got, tt.ports)
			}
		})
	}
}

func TestIsLocal(t *testing.T) {
	tests := []struct {
		target string
		local  bool
	}{
		{"127.0.0.1:15001", true},
		{"127.1.2.3:80", true},
		{"localhost:9", true},
		{"bad.target.for.testing:6003", false},
		{"10.0.0.1:80", false},
		{"[::1]:80", false},
		{"127.0.0.1", false},
		{"127.0.0.1:0", false},
	}
	for _, tt := range tests {
		if got, why := IsLocal(tt.target); got != tt.local {
			t.Errorf("IsLocal(%q) = %v (%s), want %v", tt.target, got, why, tt.local)
		}
	}
}

func TestRepoConfig(t *testing.T) {
	c, err := Load("../../../config.json")
	if err != nil {
		t.Skip("repo config not readable:", err)
	}
	for _, a := range c.Apps {
		local, skipped := a.LocalTargets()
		if len(local)+len(skipped) != len(a.Targets) {
			t.Errorf("%s: local %v skipped %v", a.Name, local, skipped)
		}
	}
}
